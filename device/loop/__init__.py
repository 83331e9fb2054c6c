"""The screening loop's parts; :class:`device.service.Service` puts them together.

Threads, and which part each one runs:

- *screening* (:mod:`device.loop.screening`): the jobs queue; the interpreter's half of every field
  (:func:`device.classifier.infer_field`), uploads and button captures.
- *frames* (:mod:`device.loop.frames`): the next frame while the current one is inferred: capture
  (:mod:`device.loop.camera`), change detection, the quality gate (:func:`device.classifier.gate_field`).
- *recorder* (:mod:`device.loop.field`): the durable commit of each result (those waiting together, in one
  database commit), then the LEDs and the page.
- one *camera* thread per opened frame source (:mod:`device.loop.camera`): every call into the driver,
  each with a time limit.
- callers: the page's request threads, gpiozero's button thread, ``start``/``stop``.

Priorities: the frames, recorder and camera threads and the page's request threads lower their own CPU priority
(:mod:`device.priority`), so the screening thread, which holds the interpreter, goes first when the cores are short.

The lock: everything that more than one thread touches is read and written with
:attr:`device.loop.board.Board.lock` held (the board itself, :class:`~device.loop.alerts.Alerts` and
:class:`~device.loop.slide.SlideTracker`); nothing calls out (LEDs, notifier, store, camera) while
holding it. State that one thread owns (the camera, the last thumbnail) takes no lock.
"""
