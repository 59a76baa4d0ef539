"""The multi-step loop: ``run_response_loop`` and its seams.

The loop itself (``run``), its events and memory-channel sinks (``events``), the step-store
protocol and step vocabulary (``steps``), the tool and model-transport seams (``tools``,
``model``), the default Open Responses transition (``transition``) and the Open Responses
output items and streaming events the loop emits (``items``).

Layer: above ``_proxy`` in the order, but independent of it: the loop talks to a model only
through ``ModelTransport`` and to storage only through ``MultiStepStore``. Stores implement those
protocols from above; ``_responses`` plugs the proxy in as the model transport.
"""
