"""``python -m realm.config`` regenerates docs/configuration.md's table."""

from realm.config.load import write_reference

if __name__ == "__main__":
    write_reference()
