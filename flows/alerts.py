"""Failure alerts as code: a Prefect automation that calls a webhook when a umo flow run fails, crashes or
times out.

    python flows/alerts.py --webhook-url https://hooks.example.com/T000/B000/XXXX    # against $PREFECT_API_URL

It saves the URL as a Webhook block (`umo-alerts`, the URL stored as a secret) and creates, or replaces, the
automation `umo-flow-run-failed`: on the events `prefect.flow-run.Failed`, `.Crashed` and `.TimedOut` of the umo
flows (umo-pipeline, umo-champion-reevaluation), POST a JSON body naming the flow, the run, its state and its
message, with a link to the run in the Prefect UI. Run it again after changing the URL: it is idempotent. Slack,
Teams or PagerDuty take a webhook of this kind; for e-mail, swap the action for SendNotification.
"""

from __future__ import annotations

import argparse
import sys

from prefect.automations import Automation
from prefect.blocks.webhook import Webhook
from prefect.events.actions import CallWebhook
from prefect.events.schemas.automations import EventTrigger, Posture

AUTOMATION = "umo-flow-run-failed"
BLOCK = "umo-alerts"
FLOWS = ("umo-pipeline", "umo-champion-reevaluation")
EVENTS = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
# Templated by Prefect when the automation fires (Jinja, with the event and its flow run).
PAYLOAD = """{
  "text": "umo: flow run {{ flow_run.name }} of {{ flow.name }} is {{ flow_run.state.name }}",
  "flow": "{{ flow.name }}",
  "flow_run": "{{ flow_run.name }}",
  "flow_run_id": "{{ flow_run.id }}",
  "state": "{{ flow_run.state.name }}",
  "message": {{ flow_run.state.message | tojson }},
  "url": "{{ flow_run | ui_url }}"
}"""


def failure_automation(block_id) -> Automation:
    """The automation (not yet saved): any Failed / Crashed / TimedOut flow run of the umo flows calls the
    webhook block `block_id`."""
    return Automation(
        name=AUTOMATION,
        description="A umo flow run failed, crashed or timed out: call the team's webhook (flows/alerts.py).",
        trigger=EventTrigger(
            expect=EVENTS,
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    )


def install(webhook_url: str, *, allow_private_urls: bool = False) -> Automation:
    """Save the webhook block and (re)create the automation; returns the saved automation."""
    block = Webhook(url=webhook_url, method="POST", headers={"Content-Type": "application/json"},
                    allow_private_urls=allow_private_urls)
    block_id = block.save(BLOCK, overwrite=True)
    try:
        Automation.read(name=AUTOMATION).delete()
    except ValueError:  # none yet
        pass
    return failure_automation(block_id).create()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webhook-url", required=True, help="where the alert is POSTed (kept as a secret)")
    parser.add_argument("--allow-private-urls", action="store_true",
                        help="allow a webhook on a private address (an in-house relay, a test)")
    args = parser.parse_args(argv)
    automation = install(args.webhook_url, allow_private_urls=args.allow_private_urls)
    print(f"automation {automation.name} ({automation.id}): {', '.join(sorted(EVENTS))} of {', '.join(FLOWS)} "
          f"-> webhook block {BLOCK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
