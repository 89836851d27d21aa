from . import qa, tofu  # noqa: F401  (light: json/csv only)
