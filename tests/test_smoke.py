from conftest import Proxy


async def test_routes_to_active_color(proxy: Proxy) -> None:
    status, body, headers = await proxy.get("/x")
    assert status == 200
    assert headers["X-Bg-Color"] == "blue"
    assert '"color": "blue"' in body
