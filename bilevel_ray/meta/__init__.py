"""Few-shot meta-learning: episodic learners (MAML, first-order MAML, iMAML, prototypical networks,
hyper-representation heads) batched over tasks with ``torch.func.vmap``, and the few-shot API
(:func:`load`, :meth:`FewShotLearner.adapt`). Imports torch only; data lives in
:mod:`bilevel_ray.tasks.vision`."""

from bilevel_ray.meta.fewshot import Evaluation, FewShotLearner, Prediction, evaluate, load, mean_ci95

__all__ = ["Evaluation", "FewShotLearner", "Prediction", "evaluate", "load", "mean_ci95"]
