"""Python helpers of the per-axis templates: ``views/<axis name>.py`` with ``view(section,
report) -> dict``, whose result reaches the axis template's ``body`` macro as ``view``. An axis
whose template needs nothing prepared has no module here."""
