"""Tool-call handler for the Evonic agent platform (https://evonic.dev): `X-Toolcall-Module: evonic`.

Evonic agents get their tools from *skills* (installable tool bundles), plugins such as the
Kanban *board*, and external *integrations* reached through *workplaces*.  With tools emulated
through the claude CLI the model sometimes answers as if one of those were down ("the board is
unavailable", "skill crm_sync is not responding") without having called anything.  The generic
handler only knows generic excuses ("I can't access tools"), so this one adds Evonic's
vocabulary; such an answer is then retried once with a nudge that rebuts it.

This file is also the worked example of a handler module: see modules/__init__.py.
"""
from claude_openai_proxy import BaseToolCallHandler, register

# What an Evonic agent wrongly claims is broken ...
_THING = r"(?:board|kanban|skill|integration|workplace|evonet|connector|plugin|service|server|api)s?"
# ... and how it says so.  "is" + one of these, or "isn't" + _NOT.
_DOWN = r"(?:not responding|unresponsive|unavailable|not available|offline|down|unreachable|not reachable)"
_NOT = r"(?:responding|available|reachable|working)"
_STATE = (r"(?:(?:is|are|seems|appears|looks)(?: to be)?(?: currently)? " + _DOWN +
          r"|(?:isn't|aren't|is not|are not)(?: currently)? " + _NOT + ")")


class EvonicHandler(BaseToolCallHandler):
    name = "evonic"
    description = "Evonic agents: generic parsing, plus one retry on 'board/skill/integration " \
                  "unavailable' excuses"

    # Every phrasing needs a definite subject ("the board", "skill crm_sync") or a first-person
    # "I couldn't reach": a user asking "what do I do when a skill is offline?" must get an
    # answer, not a retry that pushes the model into calling a tool.
    extra_refusal_patterns = (
        # "the board is unavailable", "the Kanban board seems to be offline"
        r"\bthe (?:\w+ ){0,2}" + _THING + " " + _STATE,
        # "skill 'crm_sync' is not responding", "the `jira` integration isn't responding"
        r"\b(?:skill|integration|plugin) [`'\"]?[\w.-]+[`'\"]? " + _STATE,
        r"\bthe [`'\"][\w.-]+[`'\"] (?:skill|integration|plugin) " + _STATE,
        # "I couldn't reach the billing service", "I was unable to connect to the board"
        r"\bI (?:couldn't|could not|can't|cannot|was unable to|wasn't able to|am unable to) "
        r"(?:reach|connect to|contact|access) (?:the |your )?[^.\n]{0,40}?" + _THING + r"\b",
    )

    def nudge(self):
        # Rebut the excuse itself: told only "call a tool", the model tends to repeat it.
        return ("Your previous reply did not call a tool. The tools described in your "
                "instructions, including those backed by boards, skills and integrations, are "
                "connected and working; something has failed only when a tool result says so. "
                "Call the appropriate tool now by writing a ```tool_call block.")


register(EvonicHandler)
