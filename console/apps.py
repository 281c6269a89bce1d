from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    """The pages that serve people across apps: the user dashboard and the support
    console's account pages. It may import every app; none imports it."""

    name = "console"
    verbose_name = "Console"
