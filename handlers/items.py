# /// eventfn
# description = "A small HTTP API on routes (API Gateway HTTP API events): GET /items/{id}, POST /items."
# triggers = [
#   { type = "http", path = "/items/{id}", methods = ["GET"] },
#   { type = "http", path = "/items", methods = ["POST"] },
# ]
# ///
"""Plain Lambda code for payload v2.0 events: the same file runs behind API Gateway or a function URL."""

import json


def lambda_handler(event, context):
    if event["routeKey"] == "POST /items":
        item = json.loads(event.get("body") or "{}")
        return {
            "statusCode": 201,
            "headers": {"content-type": "application/json", "location": f"/items/{item.get('id', 'new')}"},
            "body": json.dumps({"created": item}),
        }
    item_id = event["pathParameters"]["id"]
    colour = (event.get("queryStringParameters") or {}).get("colour", "plain")
    return {"id": item_id, "colour": colour, "requestId": context.aws_request_id}
