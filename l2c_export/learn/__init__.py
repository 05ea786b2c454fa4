"""Learning the routers: Learning-to-Cache's objective on a model's own sampling trajectories.

The package is also the function ``l2c_export.learn(pipe, prompts=[...], ...)`` (:func:`l2c_export.learn.live.learn`:
a router learned from a live diffusers pipeline): ``l2c_export.learn`` is this package once any of its modules is
imported, so the package itself is made callable rather than shadowed by a function of the same name.
"""

import sys
import types


class _CallableLearnPackage(types.ModuleType):
    def __call__(self, pipe, prompts=None, **options):
        """``l2c_export.learn(pipe, prompts=[...], ...)``: :func:`l2c_export.learn.live.learn`."""
        from .live import learn

        return learn(pipe, prompts, **options)


sys.modules[__name__].__class__ = _CallableLearnPackage
