"""When the daemon polls the eIM and when it falls back (SGP.32 IPAd; docs/protocol.md §7).

Pure bookkeeping, no I/O and no clock of its own: the daemon (main.py) tells it the
time and what the card worker saw, and it answers which jobs to queue. So the rules
can be tested with a fake clock:

* polling is on once an eIM is known: ``[eim] url`` in the config, or the eUICC's own
  eIM configuration holds an eIM (added by `esim-agent ipa add-eim`). Then it polls at
  once (start-up, or the moment the card is associated), every ``poll_interval``
  (0: never on a timer) and when connectivity returns: registered again after the
  daemon saw the modem unregistered;
* fallback (ES10b ExecuteFallbackMechanism, SGP.32 §5.9.20), only with an ``[eim]`` table and
  ``fallback_after`` > 0: the registration is watched every ``watch_interval``; when
  the enabled profile has not been registered for ``fallback_after`` seconds and a
  profile carries the fallback attribute (and is not the one enabled), it asks once
  for ``ipa.fallback``; again only after a registration or a change of the enabled
  profile. The fallback job tells the eIM itself (a poll with stateChangeCause
  fallback); when it could not, the daemon's next poll carries the cause.
"""
from __future__ import annotations

from dataclasses import dataclass

#: StateChangeCause fallback(1) (SGP.32 getEimPackage, asn1/sgp32.asn).
CAUSE_FALLBACK = 1
CAUSE_LOCAL = 3
#: The registration is looked at this often at most (seconds), however long fallback_after is.
WATCH_MAX = 300.0


@dataclass
class Job:
    kind: str                   # "ipa.poll" | "ipa.fallback" | "watch" (a read of the worker, not a journal job)
    params: dict
    why: str                    # for the log: "start-up", "timer", "connectivity", "eim_added", "no_registration"


def watch_interval(fallback_after: float) -> float | None:
    return min(fallback_after / 3.0, WATCH_MAX) if fallback_after > 0 else None


class IpaSchedule:
    def __init__(self, *, configured: bool, url: bool, poll_interval: float, fallback_after: float, now: float):
        self.poll_interval = float(poll_interval)
        self.fallback_after = float(fallback_after) if configured else 0.0
        self.url = url
        self.card_eims: int | None = None       # eIMs in the eUICC's configuration (None: not known yet)
        self.next_poll: float | None = now if self.active else None
        self.poll_why = "start-up"
        iv = watch_interval(self.fallback_after)
        self.watch_every = iv
        self.next_watch: float | None = now + iv if iv else None
        # what the card worker saw last
        self.registered: bool | None = None
        self.enabled: str | None = None
        self.fallback_iccid: str | None = None
        self.lost_since: float | None = None    # first time the enabled profile was seen unregistered
        self.fell_back_from: str | None = None  # the enabled ICCID ipa.fallback was asked for
        self.pending_cause: int | None = None   # stateChangeCause the next poll of ours reports

    @property
    def active(self) -> bool:
        return self.url or bool(self.card_eims)

    # --- what the daemon learns -------------------------------------------------------
    def card_eim_count(self, count: int | None, now: float) -> list[Job]:
        """The worker read the eUICC's eIM configuration (None: the card could not say)."""
        if count is None:
            return []
        was = self.active
        self.card_eims = count
        if self.active and not was:
            self.next_poll = now            # just associated (ipa add-eim), or first seen: poll now
            self.poll_why = "eim_added"
        elif not self.active:
            self.next_poll = None
        return []

    def observe(self, *, registered: bool | None, enabled_iccid: str | None, now: float,
                fallback_iccid: str | None = None, fallback_known: bool = False) -> list[Job]:
        """A registration reading (after a job or a watch). ``registered`` None: unknown (no
        AT port, the query failed) -- it neither starts nor ends a loss."""
        jobs: list[Job] = []
        if fallback_known:
            self.fallback_iccid = fallback_iccid
        if enabled_iccid != self.enabled:
            self.enabled = enabled_iccid
            self.lost_since = None          # another profile gets the whole fallback_after
        if registered is None:
            return jobs
        if registered:
            if self.registered is False and self.active:
                jobs.append(self._poll("connectivity", now))
            self.lost_since = None
            self.fell_back_from = None
        else:
            if self.lost_since is None:
                self.lost_since = now
            if (self.fallback_after > 0 and self.enabled and self.fallback_iccid
                    and self.fallback_iccid != self.enabled and self.fell_back_from != self.enabled
                    and now - self.lost_since >= self.fallback_after):
                self.fell_back_from = self.enabled
                jobs.append(Job("ipa.fallback", {}, "no_registration"))
        self.registered = registered
        return jobs

    def job_finished(self, kind: str, state: str, params: dict | None = None, result=None) -> None:
        """ipa.fallback / ipa.return_from_fallback tell the eIM themselves with a poll; when
        that poll failed (``report_error``), the next poll of ours carries the cause."""
        res = result if isinstance(result, dict) else {}
        if kind in ("ipa.fallback", "ipa.return_from_fallback") and state == "done" and res.get("report_error"):
            self.pending_cause = CAUSE_FALLBACK if kind == "ipa.fallback" else CAUSE_LOCAL
        elif kind == "ipa.poll" and state == "done" and self.pending_cause is not None \
                and (params or {}).get("state_change_cause") == self.pending_cause:
            self.pending_cause = None       # the eIM has been told

    # --- timers -------------------------------------------------------------------------
    def due(self, now: float) -> list[Job]:
        jobs: list[Job] = []
        if self.next_poll is not None and now >= self.next_poll:
            jobs.append(self._poll(self.poll_why, now))
        if self.next_watch is not None and now >= self.next_watch:
            self.next_watch = now + self.watch_every
            jobs.append(Job("watch", {}, "timer"))
        return jobs

    def next_time(self) -> float | None:
        times = [t for t in (self.next_poll, self.next_watch) if t is not None]
        return min(times) if times else None

    def _poll(self, why: str, now: float) -> Job:
        # Every poll of ours restarts the timer: a poll after connectivity returned counts too.
        self.poll_why = "timer"
        self.next_poll = now + self.poll_interval if self.active and self.poll_interval > 0 else None
        params = {"state_change_cause": self.pending_cause} if self.pending_cause is not None else {}
        return Job("ipa.poll", params, why)
