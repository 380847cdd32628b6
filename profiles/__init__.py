"""Device profiles: TOML data files, one per device. This package only exists so that they install with the code."""
