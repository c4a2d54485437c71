"""Error types shared by every layer.

Each error carries a stable snake_case ``code`` (machine readable, shown in
``--json`` output), a message that says what happened and what to do, and the
process exit code the CLI uses:

* 1 — the card or a server refused the request,
* 2 — bad usage or bad input,
* 3 — modem / transport failure or time-out.

Codes are a public contract (scripts and the daemon's clients match on them), so
they are made in one place: :func:`code_for` turns an eUICC / SM-DP+ reason name
from the specifications into its code, and :data:`EXIT_CODES` (end of this file)
gives every code the program can produce its exit code.  ``AgentError.exit_code``
comes from that table whenever the code is listed; a class's own ``exit_code``
is only the fallback for a code missing from it.  docs/protocol.md §9 summarises
the rules for readers of the JSON output.
"""
from __future__ import annotations

import re

# Patterns as text, compiled by re on first use (its cache): most commands never make a code.
_SEPARATORS = r"[^A-Za-z0-9]+"
_LOWER_PREFIXED_ACRONYM = r"(?<![A-Za-z0-9])([a-z])(?=[A-Z]{2})"   # eUICC, eSIM, eIM
_ACRONYM_THEN_WORD = r"([A-Z]+)([A-Z][a-z])"                        # PKUnknown -> PK Unknown
_WORD_START = r"([a-z0-9])([A-Z])"                                  # ciPK -> ci PK


def code_for(name: str) -> str:
    """The stable snake_case error code for a reason/result name from the specs.

    Rules (tests/test_error_codes.py pins them):

    * a capital letter after a lower-case letter or a digit starts a new word:
      ``iccidOrAidNotFound`` → ``iccid_or_aid_not_found``, ``ES10Error`` → ``es10_error``;
    * a run of capitals is one word (an acronym); when the run is followed by a
      lower-case letter, its last capital begins the next word:
      ``ciPKUnknown`` → ``ci_pk_unknown``, ``PEProcessingError`` → ``pe_processing_error``;
    * digits stay with the word they follow: ``scp03tSecurityError`` →
      ``scp03t_security_error``, ``euiccInfo2`` → ``euicc_info2``;
    * a single lower-case letter leading an acronym belongs to it:
      ``eUICCMemoryReset`` → ``euicc_memory_reset``, ``eSIM`` → ``esim``;
    * anything else than ASCII letters and digits separates words; the result is
      lower case with single underscores, so ``code_for`` of a code is the code itself.
    """
    s = re.sub(_SEPARATORS, "_", name)
    s = re.sub(_LOWER_PREFIXED_ACRONYM, lambda m: m.group(1).upper(), s)
    s = re.sub(_ACRONYM_THEN_WORD, r"\1_\2", s)
    s = re.sub(_WORD_START, r"\1_\2", s)
    s = s.strip("_").lower()
    if not s:
        raise ValueError(f"no error code can be made from {name!r}")
    return s


class _ExitCode:
    """``AgentError.exit_code``: EXIT_CODES[code] when the code is listed there,
    else a value assigned to the instance, else the class default."""

    def __get__(self, obj, cls=None) -> int:
        if obj is None:
            return cls.default_exit_code
        listed = exit_code_for(obj.code)
        if listed is not None:
            return listed
        return obj.__dict__.get("_exit_code", type(obj).default_exit_code)

    def __set__(self, obj, value: int) -> None:
        obj.__dict__["_exit_code"] = value


class AgentError(Exception):
    """Base class. ``code`` is stable; ``message`` is for people."""

    code = "agent_error"
    #: Exit code for a ``code`` missing from EXIT_CODES.  A subclass may simply
    #: write ``exit_code = N``: that becomes its ``default_exit_code``.
    default_exit_code = 1
    exit_code = _ExitCode()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        own = cls.__dict__.get("exit_code")
        if isinstance(own, int):
            cls.default_exit_code = own
            delattr(cls, "exit_code")

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def to_json(self) -> dict:
        d = {"code": self.code, "message": self.message}
        if self.details:
            d["details"] = self.details
        return d


class UsageError(AgentError):
    """The command line or an input value is wrong (exit 2)."""

    code = "bad_usage"
    exit_code = 2


class InputError(UsageError):
    """Input data (activation code, file, number) is malformed (exit 2)."""

    code = "bad_input"


class CardError(AgentError):
    """The eUICC refused or answered with an error outcome (exit 1)."""

    code = "card_error"
    exit_code = 1


class StatusWordError(CardError):
    """An APDU ended with an ISO 7816-4 error status word."""

    code = "status_word"

    def __init__(self, sw: int, message: str, *, code: str | None = None):
        super().__init__(message, code=code, details={"sw": f"{sw:04X}"})
        self.sw = sw


class ServerError(AgentError):
    """A remote server (SM-DP+, eIM) refused the request (exit 1)."""

    code = "server_error"
    exit_code = 1


class TransportError(AgentError):
    """The modem / serial line / HTTP connection failed (exit 3)."""

    code = "transport_error"
    exit_code = 3


class TimeoutError_(TransportError):  # noqa: N801 - avoid shadowing the builtin
    code = "timeout"


class PortBusyError(TransportError):
    code = "port_busy"


class ProtocolError(TransportError):
    """The peer sent something that does not parse (garbage, bad TLV, bad length)."""

    code = "protocol_error"


# --- the exit-code table -----------------------------------------------------------
#
# Every error code the program can produce, grouped by exit code.  A new code goes
# here when it is introduced (tests/test_error_codes.py scans agent/ for codes and
# fails on one that is missing).  Codes made by code_for() from the spec tables
# (es10.py result names, es8p.py ErrorReason names) and the ES9+ status codes of
# es9p.py are listed too, so the contract can be read here without running code.

REFUSED, USAGE, TRANSPORT = 1, 2, 3

_REFUSED_CODES = (
    # generic classes and outcomes
    "agent_error", "card_error", "status_word", "server_error", "crypto_error", "certificate_error",
    "store_error", "demo_failed", "download_failed", "internal_error", "worker_died", "daemon_error",
    "job_failed", "cancelled", "rolled_back", "nothing_waiting", "switch_not_effective",
    "outbox_conflict", "notification_failed", "notification_not_found", "user_rejected",
    "postponed",   # the user chose "later" at the consent prompt: the order stays usable
    # ES10 results: code_for() of the eUICC's result names (es10.py tables)
    "cat_busy", "ci_pk_unknown", "disallowed_by_policy", "euicc_challenge_mismatch", "iccid_not_found",
    "iccid_or_aid_not_found", "incorrect_input_values", "invalid_certificate", "invalid_oid",
    "invalid_signature", "invalid_transaction_id", "no_session_context", "nothing_to_delete",
    "profile_not_in_disabled_state", "profile_not_in_enabled_state", "undefined_error",
    "unsupported_curve", "wrong_profile_reenabling", "unknown_result",
    # ISO 7816-4 status words (apdu.py)
    "sw_wrong_length", "sw_channel_not_supported", "sw_secure_messaging_not_supported",
    "sw_security_status_not_satisfied", "sw_conditions_not_satisfied", "sw_incorrect_data",
    "sw_function_not_supported", "sw_file_not_found", "sw_not_enough_memory", "sw_incorrect_p1p2",
    "sw_referenced_data_not_found", "sw_ins_not_supported", "sw_cla_not_supported", "sw_card_error",
    "sw_card_memory_error", "sw_wrong_le", "sw_status_word", "channel_open_refused", "isdr_not_found",
    # profile package: BppError on the eUICC side ("bpp_"), ProfileInstallationResult seen by
    # the LPA ("install_"), each + code_for(ErrorReason name) (es8p.py)
    "bpp_error", "bpp_sequence",
    "bpp_incorrect_input_values", "bpp_invalid_signature", "bpp_invalid_transaction_id",
    "bpp_unsupported_crt_values", "bpp_unsupported_remote_operation_type", "bpp_unsupported_profile_class",
    "bpp_scp03t_structure_error", "bpp_scp03t_security_error", "bpp_iccid_already_exists",
    "bpp_insufficient_memory", "bpp_interruption", "bpp_pe_processing_error", "bpp_iccid_mismatch",
    "bpp_test_profile_invalid_naa_key", "bpp_ppr_not_allowed", "bpp_unknown_error",
    "install_incorrect_input_values", "install_invalid_signature", "install_invalid_transaction_id",
    "install_unsupported_crt_values", "install_unsupported_remote_operation_type",
    "install_unsupported_profile_class", "install_scp03t_structure_error", "install_scp03t_security_error",
    "install_iccid_already_exists", "install_insufficient_memory", "install_interruption",
    "install_pe_processing_error", "install_iccid_mismatch", "install_test_profile_invalid_naa_key",
    "install_ppr_not_allowed", "install_unknown_error",
    "bsp_error", "bsp_mac", "bsp_padding", "bsp_structure",
    # certificates, keys and signatures received from a peer (crypto.py)
    "cert_expired", "cert_not_yet_valid", "cert_bad_signature", "cert_unknown_issuer", "cert_wrong_role",
    "cert_not_ca", "cert_malformed", "bad_point", "bad_signature_format", "bad_host_id",
    # the SM-DP+ answered Failed/Expired (es9p.STATUS_CODES) or a non-2xx HTTP status
    "smdp_refused", "smdp_expired", "http_status", "eid_mismatch", "matching_id_refused",
    "confirmation_code_wrong", "confirmation_code_retries_exceeded", "order_expired",
    "download_retries_exceeded", "no_eligible_profile", "unknown_transaction", "invalid_smdp_address",
    "unknown_ci_public_key", "unsupported_ci_pkid", "svn_not_supported", "no_dpauth_certificate",
    "euicc_signature_invalid", "eum_certificate_invalid", "eum_certificate_expired",
    "euicc_certificate_invalid", "euicc_certificate_expired", "insufficient_memory", "bad_request_format",
    # the SM-DP+ is not the one the activation code / our request names: we refuse it,
    # and trying again changes nothing
    "smdp_oid_mismatch", "smdp_address_mismatch",
    # the notification outbox (store.py)
    "store_unavailable", "store_busy", "store_too_new", "unknown_notification", "bad_store_input",
    # SGP.32 ES10b results (es10.py SGP.32 tables) and the IPA (ipa.py, eim_client.py): the eIM
    # answered an error, or a package / download / rollback the eUICC refused
    "associated_eim_already_exists", "invalid_association_token", "counter_value_out_of_range",
    "command_error", "rollback_not_allowed", "fallback_not_available", "ecall_active",
    "immediate_enable_not_available", "invalid_ci_pk_id", "eim_refused", "incorrect_tag_list",
    # the eIM's error answers in an indirect download (esipa_download.py) without an ES9+ twin above
    "invalid_eim_transaction_id", "ppr_not_allowed", "event_id_unknown", "bpp_rebinding_refused",
    "metadata_mismatch",
)

_USAGE_CODES = (
    # command line, options, configuration
    "bad_usage", "bad_input", "confirmation_required", "consent_required", "confirmation_code_required",
    "no_default_smdp", "no_device", "bad_timeout", "bad_segment_size", "bad_baud", "bad_latency", "bad_aid",
    "bad_transport", "bad_quirk", "segment_size_too_small", "bad_runs", "unknown_operation",
    "config_missing", "config_invalid", "daemon_running",
    "eim_options_direct",   # --eim-url/--esipa-version/--binding while the daemon runs the card (commands/ipa.py)
    # values given to us
    "bad_iccid", "bad_eid", "bad_imei", "bad_profile_id", "bad_nickname", "bad_address", "bad_es9p_input",
    "bad_key",
    # notification sequence numbers (negative, absurd); dropping one still on the eUICC (ops/notifications.py)
    "bad_seq_number", "notification_on_euicc",
    # activation codes (ac.py)
    "ac_empty", "ac_empty_address", "ac_bad_address", "ac_too_long", "ac_bad_characters", "ac_bad_format",
    "ac_unsupported_format", "ac_missing_fields", "ac_extra_fields", "ac_bad_oid", "ac_bad_cc_flag",
    "ac_bad_ci_pkid", "ac_file_unreadable", "ac_twice", "ac_missing", "ac_bad_matching_id",
    # TLS trust configuration: no CA configured, unreadable CA file, clock not set (tls.py)
    "no_trusted_ci", "bad_ca_file", "clock_unset",
    # requests to the daemon's socket API (daemon/)
    "unknown_job", "other_device", "bad_request", "bad_json", "request_too_large", "headers_too_large",
    "method_not_allowed", "not_found",
    # GET /view/OP: no fresh reading, or not an operation the view holds (the CLI's quick path then runs a job)
    "view_stale", "not_in_view",
    # the simulated eUICC / modem / PKI (`esim-agent sim …`)
    "sim_state_error", "sim_no_eum", "sim_full", "sim_state_write", "sim_state_unreadable",
    "sim_state_corrupt", "bad_fault", "bad_network", "link_exists", "bad_file", "key_mismatch",
    "pki_missing", "pki_mismatch", "pki_no_key", "bad_imsi",
    "sim_state_busy", "link_in_use", "link_dir_missing", "bad_listen_port", "listen_port_in_use",
    "pki_not_a_directory", "pki_unwritable",
    # SGP.32: an ESipa version we do not speak (esipa.py)
    "esipa_version",
    # SGP.32 IPA: no eIM to poll, an unusable EimConfigurationData file (ops/ipa.py)
    "no_eim_configured", "bad_eim_config", "eim_config_unreadable",
)

_TRANSPORT_CODES = (
    # generic classes
    "transport_error", "timeout", "port_busy", "protocol_error", "deadline_exceeded", "daemon_lost",
    # modem and AT port (transport/)
    "modem_error", "modem_cme_error", "modem_cms_error", "modem_not_responding", "device_not_found",
    "permission_denied", "port_open_failed", "port_lost", "port_closed", "lock_failed", "write_timeout",
    "length_mismatch", "bad_response", "missing_prefix", "missing_response", "apdu_too_long",
    "short_rapdu", "get_response_loop", "card_not_back", "bad_registration",
    # garbled answers from the card
    "malformed_asn1", "malformed_tlv", "empty_response", "no_install_result", "malformed_bpp",
    "malformed_upp", "asn1_missing", "asn1tools_missing",
    # network, HTTP and TLS to the SM-DP+ (es9p.py, tls.py)
    "dns_failure", "connect_timeout", "read_timeout", "connection_refused", "connection_failed",
    "connection_lost", "http_failed", "response_deadline", "response_too_large", "malformed_json",
    "malformed_base64", "malformed_der", "missing_field", "unexpected_tag", "transaction_id_mismatch",
    "bad_transaction_id", "challenge_mismatch", "malformed_certificate",
    "tls_error", "tls_untrusted", "tls_expired", "tls_not_yet_valid", "tls_hostname_mismatch",
    "tls_wrong_role", "tls_handshake_failed",
    # test bench helpers (bench.py)
    "sim_failed", "bench_failed",
    # SGP.32: garbled eUICC packages / results and ESipa bodies (esep.py, esipa.py)
    "bad_euicc_package", "bad_euicc_package_result", "bad_esipa_message",
)


def _table(*groups: tuple[int, tuple[str, ...]]) -> dict[str, int]:
    table: dict[str, int] = {}
    for exit_code, codes in groups:
        for c in codes:
            if c in table:
                raise AssertionError(f"error code {c!r} is listed twice in EXIT_CODES")
            table[c] = exit_code
    return table


#: error code → process exit code (1 refused, 2 usage/input, 3 transport/time-out).
EXIT_CODES: dict[str, int] = _table((REFUSED, _REFUSED_CODES), (USAGE, _USAGE_CODES),
                                    (TRANSPORT, _TRANSPORT_CODES))

#: The two codes outside EXIT_CODES: a stop by signal exits 128 + the signal number,
#: as shells and service managers expect (SIGINT 2, SIGTERM 15).
SIGNAL_EXIT_CODES: dict[str, int] = {"interrupted": 130, "terminated": 143}


def exit_code_for(code: str) -> int | None:
    """The exit code of an error code, or None for a code that is not listed."""
    return EXIT_CODES.get(code) or SIGNAL_EXIT_CODES.get(code)
