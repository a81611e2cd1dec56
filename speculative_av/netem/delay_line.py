"""
When each chunk of a relayed TCP stream may be delivered, according to a :class:`NetworkModel`.

A :class:`Link` is one direction of the emulated radio link, shared by every connection through
the relay: chunks leave one after another at the direction's bandwidth (a token bucket with no
burst allowance), none during an outage. A :class:`DelayLine` is one direction of one connection:
it adds the latency of the transfer a chunk belongs to (half RTT, jitter, stall), holds whatever
would arrive during an outage until it ends, and never lets a chunk overtake an earlier one.
Chunks arriving within ``TRANSFER_GAP_S`` of the previous one belong to the same transfer and
share its latency, so a message the relay happens to read in several pieces is jittered and
stalled once, as :meth:`NetworkModel.one_way_delay_s` treats it offline.
"""
from __future__ import annotations

import math

from speculative_av.netem.profiles import Direction, Latency, NetworkModel

TRANSFER_GAP_S = 0.005


class Link:
    """One direction of the radio link: serializes chunks at the bandwidth, in arrival order."""

    def __init__(self, model: NetworkModel, direction: Direction) -> None:
        """Carry ``direction``'s traffic of ``model``."""
        self.model = model
        self.direction = direction
        self._free_at_s = -math.inf

    def transmit(self, now_s: float, nbytes: int) -> float:
        """Queue ``nbytes`` arriving at ``now_s``; return when their last bit has left."""
        start_s = self.model.outage_end_s(max(now_s, self._free_at_s))
        self._free_at_s = start_s + self.model.serialization_s(start_s, nbytes, self.direction)
        return self._free_at_s


class DelayLine:
    """One direction of one connection: delivery times in order, counting stalled transfers."""

    def __init__(self, link: Link) -> None:
        """Send this stream's chunks over ``link``."""
        self.link = link
        self.stalls = 0
        self._latency = Latency(0.0, 0.0, 0.0)
        self._last_arrival_s = -math.inf
        self._last_release_s = -math.inf

    def schedule(self, now_s: float, nbytes: int) -> float:
        """Return when the ``nbytes`` that arrived at ``now_s`` are to be delivered."""
        sent_s = self.link.transmit(now_s, nbytes)
        if now_s - self._last_arrival_s > TRANSFER_GAP_S:
            self._latency = self.link.model.sample_latency(now_s)
            self.stalls += self._latency.stall_s > 0
        self._last_arrival_s = now_s
        release_s = max(sent_s + self._latency.total_s, self._last_release_s)
        self._last_release_s = self.link.model.outage_end_s(release_s)
        return self._last_release_s
