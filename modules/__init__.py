"""Tool-call handler modules for claude_openai_proxy.py.

Every ``modules/NAME.py`` beside the proxy (names starting with ``_`` are skipped) is imported
once at start-up.  A module that fails to import does not stop the server: its error is shown
in ``--help``, logged at start-up and listed under ``module_errors`` in ``GET /health``.

A handler decides how emulated tools are described to the model, how its answers are parsed
back into tool calls, which answers count as false refusals ("I can't access that tool") and
what the single retry after such a refusal says.  A request picks one with the header
``X-Toolcall-Module: NAME``; otherwise ``--toolcall-module`` / ``CLAUDE_PROXY_TOOLCALL_MODULE``
applies, and ``generic`` is the default.

Writing one: subclass ``BaseToolCallHandler``, give it a unique ``name``, override only what
your host platform needs, and call ``register()``::

    # modules/acme.py
    from claude_openai_proxy import BaseToolCallHandler, register

    class AcmeHandler(BaseToolCallHandler):
        name = "acme"
        description = "Acme agents: also retries 'the CRM is offline'"
        # regexes, matched case-insensitively anywhere in the answer
        extra_refusal_patterns = (r"\\bthe CRM (?:is|seems) offline\\b",)

        def nudge(self):
            return "The CRM tools are online. Call the right one now in a ```tool_call block."

    register(AcmeHandler)

Overridable pieces (see BaseToolCallHandler): ``tool_prompt(tools, tool_choice)``,
``nudge()``, ``render_call()`` / ``render_result()`` (how history is shown to the model),
``parse(text, final, names)`` and ``is_refusal(text)``.  Keep refusal patterns narrow: a match
in the first few hundred characters holds back the streamed answer and costs a second model
call, and the retry asks the model to call a tool, so a pattern that matches ordinary prose
("the API error means ...") can turn a good answer into an unwanted tool call.

Import the proxy by its module name, ``claude_openai_proxy``: that works both when the proxy
runs as a script and when it is imported (tests, embedding).  See ``evonic.py`` for a worked
example.
"""
