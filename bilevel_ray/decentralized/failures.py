"""The signal a backend raises when an agent's process or node died (below the backends that raise it)."""

from __future__ import annotations

__all__ = ["AgentFailure", "AgentRestarted"]


class AgentFailure(RuntimeError):
    """An agent died during a round; the backend is ready again and wants states to restart from."""


class AgentRestarted(RuntimeError):
    """Raised by an agent actor that Ray restarted and the driver has not set up again yet (it died
    between rounds); the driver treats it as the death it reports."""
