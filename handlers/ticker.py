# /// eventfn
# description = "An async handler: module-level state lives as long as the warm worker."
# triggers = [{ subjects = ["events.ticks.>"], name = "ticks" }]
# ///
import asyncio

seen = 0  # survives across invocations on the same warm worker


async def handler(event, context):
    global seen
    seen += 1
    await asyncio.sleep(0)
    return {"seen_by_this_worker": seen, "remaining_ms": context.get_remaining_time_in_millis()}
