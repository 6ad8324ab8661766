"""The index refresher process, the trainer's index watcher, and the refresher's supervisor."""

from realm.refresh.refresher import Refresher, RefreshSettings
from realm.refresh.supervisor import RefresherSupervisor
from realm.refresh.watcher import IndexWatcher

__all__ = ["Refresher", "RefreshSettings", "RefresherSupervisor", "IndexWatcher"]
