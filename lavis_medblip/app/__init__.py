"""The web app: ``python -m lavis_medblip.app`` serves a page (NiiVue viewer) and a REST API over one model.

:mod:`.service` is what it does (upload, diagnose one model pass at a time, relevance map, report),
:mod:`.server` the FastAPI app, :mod:`.cli` the command.
"""
