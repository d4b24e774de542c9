"""Few-shot vision: Omniglot read offline from its original zips, N-way K-shot episodes, a functional
conv backbone, learn2learn's benchmarks (lazy) and the hyper-representation bilevel task."""

from bilevel_ray.tasks.vision.omniglot import OmniglotData, find_omniglot, load_omniglot

__all__ = ["OmniglotData", "find_omniglot", "load_omniglot"]
