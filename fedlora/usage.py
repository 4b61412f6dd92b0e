"""What the ``fedlora`` command and its ``fedlora deploy`` subcommands share: the error for a
mistake in what the user asked for. A leaf module (no imports), so that ``fedlora.deploy.cli``
can raise it without importing the ``fedlora`` command above it."""


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""
