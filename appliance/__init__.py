"""The appliance: CLI, server, agents, hypervisor integration, scheduler.

Layer rule: ``appliance`` builds on ``repo`` and ``fusefs``; nothing below imports it.
"""
