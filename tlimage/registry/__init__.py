"""Project-scoped image names over content-addressed snapshots (SQLite).

A registered image is a row `(project, name, tag) -> manifest`: the ordered layer digests and the
image config (env, workdir, user, entrypoint, cmd, ...). Registration is one transaction that
happens only after every layer is durably in the store, so an interrupted build registers nothing;
re-registering a name moves it atomically.
"""

from tlimage.registry.db import ImageRecord, Manifest, Registry, parse_ref

__all__ = ["ImageRecord", "Manifest", "Registry", "parse_ref"]
