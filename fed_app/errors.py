"""UserError: the one base class of every error a user fixes by changing an input (a run-config value, a
manifest, a data or weights path); its message is one sentence naming the value and the fix. Each module
defines its own subclass (DataError, shared by data.py and partition.py, lives here); `fed_app.cli.exit_on_user_error`
is the one place that catches them."""


class UserError(Exception):
    """Bad input, said in one sentence that names the value and the fix."""


class DataError(UserError, RuntimeError):
    """Data that cannot be loaded or split as asked; the message says how to fix it."""
