"""edgefleet bundles: the shared contract between the converter, the fleet server and the device.

The manifest model and its canonical bytes, archives, variant selection, declarative processing,
the Predictor with its runtimes, and TUF. See ``bundles/README.md`` and ``docs/bundle-format.md``.
"""
