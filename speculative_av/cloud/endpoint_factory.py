"""Create the endpoint a ``cloud.endpoints`` entry names, whichever protocol it speaks."""
from __future__ import annotations

from typing import Any

from speculative_av.cloud.client import CloudEndpoint
from speculative_av.cloud.endpoint import Endpoint, HealthListener
from speculative_av.cloud.endpoints import EndpointSpec, KSERVE
from speculative_av.cloud.oip_client import OipEndpoint
from speculative_av.cloud.security import ChannelSecurity


def open_endpoint(spec: EndpointSpec, *, security: ChannelSecurity, categories: list[str],
                  on_health_change: HealthListener | None = None,
                  private_connection: bool = False) -> Endpoint[Any]:
    """Connect to ``spec``'s server; replies come in the label ids of ``categories``."""
    if spec.protocol == KSERVE:
        return OipEndpoint(spec.name, spec.target, model=spec.model, security=security,
                           categories=categories, on_health_change=on_health_change,
                           private_connection=private_connection)
    return CloudEndpoint(spec.name, spec.target, security=security, categories=categories,
                         on_health_change=on_health_change,
                         private_connection=private_connection)
