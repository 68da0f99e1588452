pytest_plugins = ["hookserver"]
