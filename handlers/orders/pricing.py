"""Plain helper module of the `orders` function."""


def total(items):
    return round(sum(item.get("price", 0) * item.get("qty", 1) for item in items), 2)
