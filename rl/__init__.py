"""Meta-RL (installed as ``bilevel_ray.rl``); filled by the meta-RL issue."""
