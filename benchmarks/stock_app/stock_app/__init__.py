"""The stock Flower app that fedit's round benchmark measures against (see client_app and server_app)."""
