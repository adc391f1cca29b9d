"""The update flow: an explicit state machine (after Mender's client) that installs one bundle.

``states`` names the states and events (persisted strings), ``machine`` holds the transition table,
the resume table and the loop guard, ``record`` persists the deployment record atomically, ``steps``
does the work of each state, and ``source`` fetches signed bundles.
"""
