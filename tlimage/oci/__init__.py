"""OCI interop: image references, the registry protocol, pulls and pushes, OCI layouts and
docker-archives, and a build cache kept in a registry.

    reference.py  Docker reference normalization (docker.io/library defaults, tags, digests)
    auth.py       credentials (docker config.json, helpers) and WWW-Authenticate challenges
    client.py     Registry HTTP API v2: manifests, blobs, uploads; retries, TLS, mirrors
    pull.py       resolve a reference, fetch its layers in parallel into the layer store
    push.py       upload a stored image: blob checks, cross-repo mounts, manifest last
    layout.py     OCI image layout (dir/tar) and docker-archive export; their import
    cache.py      the step-key -> layer map as an OCI artifact (--cache-to/--cache-from)

Sits beside the executor: imports tlimage.cache, tlimage.ir and tlimage.errors only. Modules
are imported by name (`from tlimage.oci import pull`), never here, so importing the package
costs nothing.
"""
