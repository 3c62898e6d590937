"""notifier: follow a CouchDB ``_changes`` feed and email every new message's recipient."""

__version__ = "0.1.0"
