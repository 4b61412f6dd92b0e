"""Names of the records in fedlora's Flower messages, shared by the server and clients.

A training request carries the global adapter (``ADAPTER``) and the round's settings
(:class:`~fedlora.round_settings.RoundSettings`) as JSON (``SETTINGS``); the reply carries the
client's delta (``ADAPTER``) and its ``METRICS`` (example count, training loss, timings). An
identity query is answered with the client's id (``IDENTITY``), or by an edge aggregator with
its role and cell.
Between the cloud and an edge, a ``CELL`` record carries one cell's request or result.

Secure aggregation (``privacy=secagg``) sends one message per stage, of message type
``train.<SECAGG>``: a ``SECAGG`` ConfigRecord with the stage name, the round and the
stage's payload (bytes), the ``SETTINGS``, and at the first stage the ``ADAPTER`` to train
from. The reply carries the client's answer as bytes in a ``SECAGG`` ConfigRecord
(``REPLY_KEY``) and clear ``METRICS`` (the training time only). Between stages the device
keeps its session state in ``context.state[SECAGG_STATE]`` (never sent anywhere).
"""

import json

from fedlora.round_settings import RoundSettings, RoundSettingsError

ADAPTER = "adapter"
SETTINGS = "settings"
METRICS = "metrics"
IDENTITY = "identity"
SETTINGS_KEY = "json"
CLIENT_ID_KEY = "client"
SECAGG = "secagg"
STAGE_KEY = "stage"
ROUND_KEY = "round"
PAYLOAD_KEY = "payload"
REPLY_KEY = "reply"
SECAGG_STATE = "fedlora.secagg"


def encode_settings(settings: RoundSettings) -> str:
    return json.dumps(settings.to_dict(), sort_keys=True)


def decode_settings(text: str) -> RoundSettings:
    """A request's round settings; :class:`~fedlora.round_settings.RoundSettingsError` naming what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise RoundSettingsError(f"training request settings are not JSON: {exc}") from None
    return RoundSettings.from_dict(doc)

# Cloud <-> edge aggregator (deployment): a cell request/result as fedlora.roles.neighbourhood wire bytes.
CELL = "cell"
CELL_REQUEST_KEY = "request"
CELL_RESULT_KEY = "result"
CELL_TIMEOUT_KEY = "timeout-s"
# An edge's identity: role "edge" and the neighbourhood cell it aggregates.
ROLE_KEY = "role"
CELL_KEY = "cell"
EDGE_ROLE = "edge"
# Devices that move between edges (fedlora.world.attachments): a roaming device's identity also
# carries its attachment count; the cloud asks each edge for a REPORT (message type
# ``query.<REPORT>``) of the END devices connected to it, answered as JSON {client: count}.
ATTACHMENT_KEY = "attachment"
REPORT = "report"
REPORT_KEY = "devices"
# Split learning in a deployment (fedlora/deploy/split_session.py): the edge's training message to a split
# device (plain, or the secure session's first stage) carries a SPLIT ConfigRecord with the order as JSON.
SPLIT = "split"
SPLIT_KEY = "order"
