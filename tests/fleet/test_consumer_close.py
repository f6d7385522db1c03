import asyncio

from fleet.consumers import OpampConsumer


class GoneClient(OSError):
    """What uvicorn raises (its ClientDisconnected is an OSError) on a send after the client left."""


def test_a_scheduled_close_after_the_agent_left_raises_nothing():
    consumer = OpampConsumer()
    sent = []

    async def base_send(message):
        sent.append(message)
        raise GoneClient()

    consumer.base_send = base_send

    async def run():
        task = asyncio.ensure_future(consumer.close_unless_gone())
        await task
        return task

    task = asyncio.run(run())
    assert sent == [{"type": "websocket.close", "code": 1000}]
    assert task.exception() is None


def test_a_scheduled_close_reaches_a_connected_agent():
    consumer = OpampConsumer()
    sent = []

    async def base_send(message):
        sent.append(message)

    consumer.base_send = base_send
    asyncio.run(consumer.close_unless_gone())
    assert sent == [{"type": "websocket.close", "code": 1000}]
