"""HTTP routers, one file per area; `fleet.app.create_app` includes them."""
