"""Model runtimes behind one small interface (:class:`bundles.runtimes.base.Runtime`).

Each runtime lives in its own module and imports its library lazily, so a device needs only the
runtime its variant uses. :func:`bundles.runtimes.base.load_runtime` maps a variant target to it.
"""
