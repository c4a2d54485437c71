"""`esim-agent sim ...`: the simulated-card test bed (modem on a pty, test
PKI, local SM-DP+). Parsers only here; the heavy modules load on use."""
from __future__ import annotations

from ..errors import UsageError


def add_parsers(sub) -> None:
    sim = sub.add_parser("sim", help="simulated modem / eUICC / SM-DP+ test bed")
    ss = sim.add_subparsers(dest="sub", metavar="ACTION", parser_class=type(sim))
    ss.required = True

    m = ss.add_parser("modem", help="serve a simulated modem + eUICC on a pseudo-terminal until killed")
    m.add_argument("--state", required=True, metavar="FILE", help="the simulated eUICC's state file (created if missing)")
    m.add_argument("--link", metavar="PATH", help="symlink the pty at PATH")
    m.add_argument("--preload", type=int, default=0, metavar="N", help="install N test profiles on a new card")
    m.add_argument("--baud", type=int, metavar="N", help="emulate a UART at N baud")
    m.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault (repeatable): echo, urc, lowercase, no-prefix, no-test-forms, refresh, error@N, "
                        "cme=CODE@N, silent@N, delay=SECONDS[@N], garbage, max-apdu=BYTES, opaque-session, "
                        "reenumerate[=SECONDS] (AT+CFUN=0 / AT+CFUN=1,1 make the port vanish and come back "
                        "as a new pty)")
    m.add_argument("--stats", metavar="FILE",
                   help="keep JSON counters (bytes each way, echo bytes, AT commands, APDUs, GET RESPONSEs) in FILE, "
                        "rewritten after every command")
    m.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                   help="delay each AT+CSIM/CGLA answer, as real modems do (66-94 ms measured)")
    m.add_argument("--network", action="append", default=[], metavar="ICCID:MODE",
                   help="how the network treats a profile (repeatable; default ok): ok (registered at once), "
                        "roaming, never (searching for ever), denied, after=SECONDS (searching, then registered); "
                        "the modem's +CEREG/+CREG/+C5GREG follow the enabled profile")
    m.add_argument("--iot", action="store_true",
                   help="an SGP.32 IoT eUICC: eIM association, signed eUICC packages, fallback and rollback "
                        "(kept in the state file; an existing SGP.22 card becomes one)")
    _identity_args(m)
    m.set_defaults(func=cmd_sim_modem)

    k = ss.add_parser("pki", help="write a test PKI (CI, EUM, DPauth, DPpb, DP TLS) to DIR")
    k.add_argument("dir")
    k.add_argument("--tls-name", action="append", metavar="NAME",
                   help="host name for the DP TLS certificate (repeatable; default localhost)")
    k.set_defaults(func=cmd_sim_pki)

    s = ss.add_parser("smdpp", help="serve a local SM-DP+ (ES9+ over HTTPS) with a Super SIM-style reservation API")
    s.add_argument("--pki", required=True, metavar="DIR", help="test PKI written by `sim pki`")
    s.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    s.add_argument("--address", metavar="NAME:PORT", help="the SM-DP+ address devices use (default localhost:PORT)")
    s.add_argument("--auth", metavar="SID:TOKEN", help="HTTP Basic credentials for the reservation API")
    s.add_argument("--state", metavar="FILE", help="persist reservations to FILE")
    s.add_argument("--profile-size", type=int, metavar="BYTES",
                   help="pad generated profile packages to BYTES (realistic packages are 10-20 KB)")
    s.add_argument("--session-ttl", type=float, default=600.0, metavar="SECONDS",
                   help="forget unfinished download sessions after SECONDS; an order whose package was "
                        "fetched but never installed becomes available again (default 600)")
    s.set_defaults(func=cmd_sim_smdpp)

    e = ss.add_parser("eim", help="serve a local eIM (SGP.32 ESipa over HTTPS) with an emnify-style operations API")
    e.add_argument("--pki", required=True, metavar="DIR",
                   help="test PKI written by `sim pki`; the eIM keeps its certificates, state and "
                        "EimConfigurationData (eim-config.der, for `ipa add-eim`) in DIR/eim")
    e.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    e.add_argument("--token", metavar="T", help="Bearer token the operations API requires (default: none)")
    e.add_argument("--esipa-version", choices=("1.2", "1.0"), default="1.2",
                   help="ESipa wire forms to speak (default 1.2)")
    e.add_argument("--indirect", action="store_true",
                   help="offer indirect profile download (indirectProfileDownload in eim-config.der): IPAs "
                        "then download through the eIM, which relays ES9+ to the SM-DP+ (trusting DIR/ci.pem)")
    e.set_defaults(func=cmd_sim_eim)


def _identity_args(p) -> None:
    p.add_argument("--pki", metavar="DIR", help="take the eUICC identity from a test PKI (issued by its EUM)")
    p.add_argument("--euicc-cert", metavar="FILE", help="eUICC certificate (DER or PEM)")
    p.add_argument("--euicc-key", metavar="FILE", help="eUICC private key (DER or PEM)")
    p.add_argument("--eum-cert", action="append", default=[], metavar="FILE", help="EUM certificate (repeatable)")
    p.add_argument("--ci-cert", action="append", default=[], metavar="FILE", help="CI certificate (repeatable)")


def euicc_kwargs(args) -> dict:
    if bool(args.euicc_cert) != bool(args.euicc_key):
        raise UsageError("--euicc-cert and --euicc-key go together")
    if args.euicc_cert and args.pki:
        raise UsageError("use either --pki or --euicc-cert/--euicc-key, not both")
    return {"pki_dir": args.pki, "euicc_cert": args.euicc_cert, "euicc_key": args.euicc_key,
            "eum_certs": tuple(args.eum_cert), "ci_certs": tuple(args.ci_cert)}


def cmd_sim_modem(args, out) -> int:
    from .modem import serve_modem
    kw = euicc_kwargs(args)
    pki_dir = kw.pop("pki_dir")
    serve_modem(args.state, link=args.link, preload=args.preload, baud=args.baud, faults=args.fault,
                pki_dir=pki_dir, euicc_kwargs=kw, network=args.network, stats_path=args.stats,
                latency=args.latency, iot=args.iot)
    return 0


def cmd_sim_pki(args, out) -> int:
    from .pki import make_pki
    pki = make_pki(args.dir, tls_names=tuple(args.tls_name or ("localhost",)))
    out.ok({"dir": args.dir, "ci": f"{args.dir}/ci.pem", "smdp_oid": pki.smdp_oid},
           f"test PKI written to {args.dir}; trust anchor: {args.dir}/ci.pem (pass it as --ca)")
    return 0


def cmd_sim_smdpp(args, out) -> int:
    from .smdpp import ListenError, serve_smdpp
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port: use 0-65535 (0: any free port)",
                         code="bad_listen_port")
    auth = None
    if args.auth:
        if ":" not in args.auth:
            raise UsageError("--auth wants SID:TOKEN")
        auth = tuple(args.auth.split(":", 1))

    def ready(server) -> None:
        print(f"local SM-DP+ listening on https://127.0.0.1:{server.port} (address {server.address})", flush=True)
    try:
        serve_smdpp(args.pki, port=args.port, address=args.address, auth=auth, state_path=args.state, ready=ready,
                    profile_size=args.profile_size, session_ttl=args.session_ttl)
    except ListenError as e:
        raise _listen_refused(e) from None
    return 0


def cmd_sim_eim(args, out) -> int:
    from .eim import run_eim
    from .smdpp import ListenError
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port: use 0-65535 (0: any free port)",
                         code="bad_listen_port")

    def ready(server) -> None:
        print(f"local eIM listening on https://127.0.0.1:{server.port} (ESipa {server.version}"
              f"{', indirect download' if server.indirect else ''}); "
              f"eIM configuration for `ipa add-eim`: {server.config_path}", flush=True)
    try:
        run_eim(args.pki, port=args.port, token=args.token, version=args.esipa_version, ready=ready,
                indirect=args.indirect)
    except ListenError as e:
        raise _listen_refused(e) from None
    return 0


def _listen_refused(e) -> UsageError:
    """Why `sim smdpp` cannot listen, said for the person who chose the port (exit 2)."""
    import errno
    if e.errno == errno.EADDRINUSE:
        return UsageError(f"port {e.port} on {e.host} is already in use (another `esim-agent sim smdpp`?): pick "
                          "another --port, or --port 0 for any free one", code="listen_port_in_use")
    if e.errno in (errno.EACCES, errno.EPERM):
        return UsageError(f"no permission to listen on port {e.port} (ports below 1024 need root): pick another "
                          "--port, e.g. 8443", code="bad_listen_port")
    return UsageError(f"cannot listen on {e.host} port {e.port}: {e.strerror}", code="bad_listen_port")

