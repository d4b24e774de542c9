"""bilevel-ray: decentralized stochastic bilevel optimization on Ray."""
