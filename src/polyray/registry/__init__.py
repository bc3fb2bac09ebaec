"""Model specs, versions and where their files live."""
