# /// eventfn
# description = "Greets whoever the event names; the quickstart's example."
# timeout = 5
# triggers = ["events.greetings.>"]
# [environment]
# GREETING = "Hello"
# ///
"""A plain AWS Lambda handler: nothing here imports eventfn."""

import os

GREETING = os.environ.get("GREETING", "Hello")  # module-level code runs once per warm worker


def lambda_handler(event, context):
    name = event.get("name", "world") if isinstance(event, dict) else str(event)
    print(f"greeting {name}")
    return {"message": f"{GREETING}, {name}!", "requestId": context.aws_request_id}
