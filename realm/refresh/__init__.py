"""The index refresher process, the trainer's index watcher, and the refresher's supervisor.

The names below are imported on first use, so that ``launch/refresh_index.py --help`` answers
without importing torch.
"""

_WHERE = {"Refresher": "realm.refresh.refresher", "RefreshSettings": "realm.refresh.refresher",
          "RefresherSupervisor": "realm.refresh.supervisor",
          "IndexWatcher": "realm.refresh.watcher"}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'realm.refresh' has no attribute {name!r}")
