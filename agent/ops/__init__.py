"""The operations layer: every user-visible operation as a function with plain
arguments, called by the CLI (direct mode), the daemon's card worker, the demo
and the benchmarks alike.

An operation is ``op(ctx, card, **params) -> dict``: ``card`` is an open
``Card``, ``params`` are JSON-able values (so a request over the daemon's
socket carries them unchanged), the result is the ``data`` of the CLI's
``--json`` envelope. Errors are ``AgentError``s. Nothing here parses
command lines or prints.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from collections.abc import Callable

TYPE_CHECKING = False   # typing's import (~5 ms) only for checkers: annotations are strings here
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

from ..cancel import CancelToken
from .card import Card, CardSettings  # noqa: F401 - re-exported for callers
from ..logs import get_logger

log = get_logger(__name__)


@dataclass
class ServerSettings:
    """Trust and deadlines for the HTTPS servers (SM-DP+)."""
    ca: str | None = None               # --ca: trusted CI certificate(s)
    config_ca: str | None = None        # ca_bundle from the config file
    insecure_http: bool = False
    http_timeout: float | None = None   # one deadline per ES9+ function call (--http-timeout, http_timeout)

    def pool(self, ci_pkids=None) -> "ClientPool":
        return ClientPool(ca=self.ca, config_ca=self.config_ca, insecure_http=self.insecure_http, ci_pkids=ci_pkids,
                          deadline=self.http_timeout)


class ClientPool:
    """One ES9+ client per address (a download's SM-DP+, each notification's), sharing the trust
    settings; a download and the delivery of its notifications share its connection."""

    def __init__(self, *, ca=None, config_ca=None, insecure_http: bool = False, ci_pkids=None,
                 deadline: float | None = None):
        self.kw = {"ca": ca, "config_ca": config_ca, "insecure_http": insecure_http, "deadline": deadline}
        self.ci_pkids = ci_pkids
        self.clients: dict[str, object] = {}
        self.closed = False

    def __call__(self, address: str):
        c = self.clients.get(address)
        if c is None:
            if self.closed:         # e.g. a preload step of an operation that has ended
                raise RuntimeError("this ES9+ client pool is closed")
            from ..es9p import Es9pClient    # on the first client: the pool itself imports no TLS
            c = Es9pClient(address, **self.kw)
            if self.ci_pkids:
                c.narrow_to(self.ci_pkids)
            self.clients[address] = c
        return c

    def close(self) -> None:
        self.closed = True
        for c in self.clients.values():
            c.close()
        self.clients.clear()

class Steps:
    """Where an operation records its steps before it runs them. The daemon's job
    journal implements it durably; direct CLI use records nothing."""

    def step(self, name: str, **data: Any) -> None:
        pass

    def seen(self, name: str) -> dict | None:
        """The data recorded with step ``name`` in an earlier run of the same job, if any."""
        return None

    def child(self, prefix: str) -> "Steps":
        """Steps of a sub-operation (an enable inside a sync), kept apart by a name prefix."""
        return Steps()


@dataclass
class EimSettings:
    """The IPA's eIM settings (config table ``[eim]``, SGP.32; docs/protocol.md §7).

    ``url`` None: use the eIM address (eimFqdn) from the eUICC's own eIM configuration
    (ES10b GetEimConfigurationData)."""
    url: str | None = None
    poll_interval: float = 86400.0       # seconds between polls (0: start-up and `ipa poll` only)
    esipa_version: str = "1.2"           # "1.2" | "1.0": the eIM's ESipa wire forms
    binding: str = "asn1"                # "asn1" | "json": ESipa HTTP binding
    ca: str | None = None                # trusted CA(s) for the eIM's TLS; None: the eIM config's trustedPublicKeyDataTls, then the system store
    fallback_after: float = 900.0        # seconds without registration before ExecuteFallbackMechanism
    max_packages: int = 32               # packages one poll executes at most (a misbehaving eIM cannot loop us)


@dataclass
class Context:
    """What an operation runs with besides the card: servers, state, policies, hooks."""
    servers: ServerSettings = field(default_factory=ServerSettings)
    state_dir: str | Path | None = None     # the outbox's directory; None: config.state_dir()
    notifications: bool = True          # send the notifications an operation causes right away
    refresh: bool = True                # refreshFlag for enable/disable
    rollback_after: float = 420.0       # seconds to wait for network registration after a switch
    registration_poll: float = 2.0
    default_smdp: str | None = None     # `sync` asks this SM-DP+ instead of the eUICC's default
    auto_enable: bool = False           # `sync` enables what it installed (checked switch)
    eim: EimSettings = field(default_factory=EimSettings)
    cancel: CancelToken = field(default_factory=CancelToken)
    steps: Steps = field(default_factory=Steps)
    # For people: progress(step, done, total) and warnings. Both may be None.
    progress: Callable[[str, int, int], None] | None = None
    warn: Callable[[str], None] | None = None
    # consent(metadata) -> True (install), False (reject: endUserRejection, final for the order) or
    # flows.download.POSTPONE ("later": postponed, the order stays usable), when the user must see
    # the profile before it is installed.
    consent: Callable[[Any], bool | str] | None = None
    ask_confirmation_code: Callable[[], str | None] | None = None

    def warning(self, msg: str) -> None:
        if self.warn:
            self.warn(msg)
        else:
            log.warning("%s", msg)

    def outbox_path(self) -> Path:
        from pathlib import Path

        from .. import config
        from ..store import DB_NAME
        return (Path(self.state_dir) if self.state_dir else config.state_dir()) / DB_NAME


#: Operation name → (module of this package, function). Names are what the daemon's socket API takes.
_OPS = {
    "chip.info": ("chip", "info"),
    "chip.set_default_dp": ("chip", "set_default_dp"),
    "chip.reset": ("chip", "reset"),
    "profile.list": ("profiles", "list_profiles"),
    "profile.enable": ("switch", "enable"),
    "profile.disable": ("switch", "disable"),
    "profile.delete": ("profiles", "delete"),
    "profile.nickname": ("profiles", "nickname"),
    "profile.download": ("download", "download"),
    "notification.list": ("notifications", "list_notifications"),
    "notification.remove": ("notifications", "remove"),
    "notification.drop": ("notifications", "drop"),
    "notification.process": ("notifications", "process_op"),
    "sync": ("download", "sync"),
    "ipa.add_eim": ("ipa", "add_eim"),
    "ipa.list_eim": ("ipa", "list_eim"),
    "ipa.poll": ("ipa", "poll"),
    "ipa.status": ("ipa", "status"),
    "ipa.return_from_fallback": ("ipa", "return_from_fallback"),
    "ipa.fallback": ("ipa", "fallback"),
}


#: What an operation imports after the card is open, beyond its own module and the ES10 client:
#: imported while the modem answers the session start (agent/preload.py). Only names the
#: operation really imports (tests/test_preload.py imports each); a stale entry costs time, not
#: correctness. Leaves before the modules importing them: each step then stays short.
#: (A download loads the ASN.1 tables and the package's code while the card runs AuthenticateServer,
#: the outbox's code while the package loads: ops/download.py.)
_ES9P = ("socket", "ssl", "agent.cert", "agent.tls", "agent.http1", "agent.httpdeadline", "agent.es9p")
_PRELOAD = {
    "profile.download": ("agent.flows.download",) + _ES9P,
    "sync": ("agent.flows.download",) + _ES9P + ("agent.bpp",),
    "notification.process": ("agent.flows.notifications",) + _ES9P + ("agent.store",),
}


#: Loading the ASN.1 tables (agent/asn1tables.py): the module, asn1tools' codecs package, its BER/DER
#: modules, the tables, the encoders (five steps, each about as long as a short exchange with the modem).
TABLES = ("agent.asn1tables", "agent.asn1tables:warm_codecs", "agent.asn1tables:warm_modules",
          "agent.asn1tables:warm", "agent.asn1tables:warm_encode")
#: The tables and the eUICC's answers beyond the first calls (es10_types.py).
DECODING = TABLES + ("agent.es10_types",)
#: Operations whose first ES10 calls need neither (es10.FIXED_REQUESTS, codec.read_fields): they
#: load once the ISD-R session is open, while the card answers those calls, instead of during
#: the session start, which has enough to import already (`chip info` only decodes). A download
#: needs none before the card's AuthenticateServer and loads them then (ops/download.py).
#: (`chip info`: the short steps first, for the card's short first answer, GetEID.)
_AFTER_OPEN = {"chip.info": (TABLES[0], "agent.es10_types") + TABLES[1:4], "profile.download": (), "sync": DECODING}


def preload_modules(name: str) -> tuple[str, ...]:
    """What operation ``name`` needs once the card is open, soonest first, for agent/preload.py:
    the ES10 client, json (the CLI prints with it at the end), and (unless session_preload has
    them) the ASN.1 tables and decoded types, the operation's module, then the rest."""
    module = _OPS.get(name, (None,))[0]
    own = (f"{__name__}.{module}",) if module else ()
    decoding = () if name in _AFTER_OPEN else DECODING
    return ("agent.apdu", "agent.tlv", "agent.ids", "agent.codec", "agent.es10", "json") + decoding + own \
        + _PRELOAD.get(name, ())


def session_preload(name: str) -> tuple[str, ...]:
    """What operation ``name`` has loaded once the ISD-R session is open (after what
    preload_modules named): the tables and decoded types, for operations that start without them."""
    return _AFTER_OPEN.get(name, ())


class _Registry(Mapping):
    """The operations by name, each module imported when its operation is looked up (`chip info`
    need not import the download, IPA and switch code)."""

    def __getitem__(self, name: str) -> Callable[..., dict]:
        import importlib
        module, attr = _OPS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def __iter__(self):
        return iter(_OPS)

    def __len__(self) -> int:
        return len(_OPS)


def registry() -> Mapping[str, Callable[..., dict]]:
    """Operation name → function. Names are what the daemon's socket API takes."""
    return _Registry()


#: Operations that only read: the daemon does not journal their steps and never retries them.
READ_ONLY = frozenset({"chip.info", "profile.list", "notification.list", "ipa.list_eim", "ipa.status"})


def check_http_timeout(value, name: str = "--http-timeout") -> float:
    """Seconds for one ES9+ function call, retries included: above 0, at most an hour."""
    import math
    from ..errors import UsageError
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not 0 < value <= 3600:
        raise UsageError(f"{name} must be a number of seconds above 0 (at most 3600), not {value!r}",
                         code="bad_timeout")
    return float(value)


def run(name: str, ctx: Context, card: Card, params: dict) -> dict:
    ops = registry()
    if name not in ops:
        from ..errors import UsageError
        raise UsageError(f"unknown operation {name!r}", code="unknown_operation")
    ctx.cancel.check()
    params = dict(params)
    # Per-request server trust and notification choice (CLI options) belong to the context.
    if params.get("ca"):
        ctx.servers.ca = params.pop("ca")
    params.pop("ca", None)
    if params.pop("insecure_http", False):
        ctx.servers.insecure_http = True
    if params.get("http_timeout") is not None:
        ctx.servers.http_timeout = check_http_timeout(params.pop("http_timeout"))
    params.pop("http_timeout", None)
    if params.pop("no_notifications", False):
        ctx.notifications = False
    return ops[name](ctx, card, **params)
