"""Git-push blue/green deployment: ``git push green main`` builds, checks and swaps in a release.

Two slices, ``green`` and ``blue``, each a bare repository whose post-receive hook runs
:mod:`dockpart.deploy.hook`.  A slice port is served by a small forwarder
(:mod:`dockpart.deploy.forward`) that sends each new connection to the slice's current
container, so a new release is started and health-checked beside the old one and then
swapped in without a refused connection.  ``dockpart deploy switch`` moves the front route
(a ``dockpart-proxy`` reading :data:`dockpart.keys.DEPLOY_LIVE`) between slices.
"""
