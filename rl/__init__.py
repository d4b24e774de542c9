"""Meta-RL (installed as ``bilevel_ray.rl``): meta-environments with a task protocol, policies,
rollouts, policy-gradient estimators and meta-RL as bilevel optimization.

Importing the package registers the built-in meta-environments with gymnasium
(``gymnasium.make("BilevelRay/Navigation2D-v0")``); MuJoCo is imported only when a MuJoCo one is made.
"""

from bilevel_ray.rl.core import (ENTRY_POINT_GROUP, NAMESPACE, MetaEnv, EnvTask, check_meta_env, get_env_task,
                                 load_plugins, make_env, meta_env_ids, register_builtin, set_env_task)

register_builtin()

__all__ = ["ENTRY_POINT_GROUP", "NAMESPACE", "MetaEnv", "EnvTask", "check_meta_env", "get_env_task", "load_plugins",
           "make_env", "meta_env_ids", "register_builtin", "set_env_task"]
