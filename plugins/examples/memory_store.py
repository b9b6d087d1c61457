"""memory_store: a storage plugin that keeps received objects in memory, under memory-store: URIs.

Received objects (C-STORE, STOW-RS) go to store() instead of files once the config says

    [storage]
    scheme = memory-store

and everything that reads an instance (C-MOVE, C-GET, /legacy/file, dicoogle.file) reads it
back through get(). Memory is gone at a restart: at start the daemon asks list() and unindexes
what is no longer kept. A real storage plugin writes to an object store or a database.

Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind storage` does, with
SCHEME made from NAME), set [storage] scheme, restart. Storage plugins are Python only.
Course: chapter 9, exercise 3 (storage plugins).
"""

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": True}
#: The URI scheme of what this plugin keeps: lower case, not "file".
SCHEME = "memory-store"
_objects = {}  # uri -> the object's Part 10 bytes


def store(sop_uid, data):
    """Keep one object; return its URI only once it is safe: the sender hears "success" next."""
    uri = f"{SCHEME}:{sop_uid}"
    _objects[uri] = bytes(data)
    return uri


def get(uri):
    """The bytes kept at uri."""
    return _objects[uri]


def list():  # noqa: A001 (the storage API's name)
    """Every URI kept."""
    return [*_objects]


def remove(uri):
    """Delete what is kept at uri (POST /management/tasks/remove)."""
    _objects.pop(uri, None)
