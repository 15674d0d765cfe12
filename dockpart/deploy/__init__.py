"""Git-push blue/green deployment: ``git push green main`` builds, checks and swaps in a release.

Two slices, ``green`` and ``blue``, each a bare repository whose pre-receive hook runs
:mod:`dockpart.deploy.hook` (so a failed deployment refuses the push).  A slice port is
served by a small forwarder (:mod:`dockpart.deploy.forward`, started and stopped by
:mod:`dockpart.deploy.supervise`) that sends each new connection to the slice's current
container, so a new release is started and health-checked beside the old one and then
swapped in without a refused connection.  ``dockpart deploy switch`` moves the front route
(a ``dockpart-proxy`` reading :data:`dockpart.keys.DEPLOY_LIVE`) between slices.
"""
