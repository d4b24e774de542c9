"""Bilevel algorithms: one module each, registered by name (see :func:`available`)."""

from bilevel_ray.algorithms.base import (BilevelAlgorithm, Calls, Hyperparams, Mix, available, get,
                                         identity_mix, make, register)
from bilevel_ray.algorithms.aid_cg import AIDCG
from bilevel_ray.algorithms.bome import BOME
from bilevel_ray.algorithms.dsbo import DSBO, DSBOGT, DSOBA
from bilevel_ray.algorithms.itd import ITD
from bilevel_ray.algorithms.mgbio import MGBiO
from bilevel_ray.algorithms.msgbio import MSGBiO
from bilevel_ray.algorithms.saba import SABA
from bilevel_ray.algorithms.soba import SOBA
from bilevel_ray.algorithms.stocbio import StocBiO
from bilevel_ray.algorithms.vr_msgbio import VRMSGBiO

__all__ = ["BilevelAlgorithm", "Calls", "Hyperparams", "Mix", "available", "get", "identity_mix", "make",
           "register", "AIDCG", "BOME", "DSBO", "DSBOGT", "DSOBA", "ITD", "MGBiO", "MSGBiO", "SABA", "SOBA", "StocBiO",
           "VRMSGBiO"]
