"""The study report (`build.build_report`), its figures (`figures.make_figures`) and the model card (`card`).

Nothing is imported here, so that importing one part does not pull in matplotlib or Jinja2 for the others.
"""
