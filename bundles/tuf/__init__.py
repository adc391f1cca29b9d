"""TUF for edgefleet: keys, root metadata, the repository, publications and the device client.

The modules are imported one by one (``from bundles.tuf.repository import TufRepository``) so that a
device that only needs the client does not load the repository code, and the reverse.

- :mod:`bundles.tuf.keys`: Ed25519 key files (PKCS#8 PEM, mode 0600) and public-key dicts.
- :mod:`bundles.tuf.root`: signed root metadata, including rotation (version N+1 signed by old and new keys).
- :mod:`bundles.tuf.publication`: the workstation side of a release (a new targets version signed
  offline, packed with its files) and the safe reading of such a package.
- :mod:`bundles.tuf.repository`: the repository on disk (the fleet server, or a local directory).
- :mod:`bundles.tuf.client`: the device side, ``tuf.ngclient`` over httpx with resumable downloads.
- :mod:`bundles.tuf.testing`: a threaded loopback HTTP server with fault injection for tests.

The trust model is described in ``docs/security.md``.
"""
