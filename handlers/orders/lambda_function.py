"""A folder function: its own modules beside the entry module, settings in eventfn.toml."""

from pricing import total


def lambda_handler(event, context):
    order = event if isinstance(event, dict) else {}
    return {"orderId": order.get("id"), "total": total(order.get("items", []))}
