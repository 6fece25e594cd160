# Data only: this directory ships inside the wheel as the package `dromedary.prompts`
# (see pyproject.toml). The file exists so that importlib.resources can locate it.
