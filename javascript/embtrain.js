// Embedding Trainer tab: the start function (task id for the WebUI's progress bar), a live loss chart and the
// preview images as they arrive.
// Every global here starts with "embtrain"; no libraries, no network beyond this WebUI's own routes.

var embtrainPollTimer = null;
var embtrainRunId = null; // the run the chart follows
var embtrainTaskId = null; // the WebUI task id of the run this page started, until that run shows up
var embtrainTaskEnded = false; // the WebUI says that task is over (a run refused at its start never shows up)

function embtrainEl(id) {
    return gradioApp().getElementById(id);
}

// Called by gradio (_js) with the Start button's inputs; the first is replaced by a new task id.
function embtrain_start() {
    var id = randomId();
    var anchor = embtrainEl('embtrain_progress_anchor');
    var live = embtrainEl('embtrain_live');
    // The result HTML is gradio's to render: clearing its DOM here would detach the node gradio updates.
    // Follow exactly the run this click starts: the server records it under this task id.
    embtrainRunId = null;
    embtrainTaskId = id;
    embtrainTaskEnded = false;
    embtrainChartReset();
    if (anchor) {
        requestProgress(id, anchor, null, function() {
            if (live) live.textContent = '';
            embtrainTaskEnded = true;
            embtrainPoll();
        }, function(progress) {
            if (live && progress.textinfo) live.textContent = progress.textinfo;
        });
    }
    embtrainStartPolling();
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

function embtrainStartPolling() {
    if (embtrainPollTimer) return;
    embtrainPollTimer = setInterval(embtrainPoll, 1000);
    embtrainPoll();
}

function embtrainStopPolling() {
    if (embtrainPollTimer) clearInterval(embtrainPollTimer);
    embtrainPollTimer = null;
}

function embtrainFetch(path) {
    return fetch(path, {credentials: 'same-origin', cache: 'no-store'}).then(function(r) {
        if (!r.ok) throw new Error(path + ': HTTP ' + r.status);
        return r.json();
    });
}

// The run to follow: the one this page started (by its task id; until the server has created it, none), else
// the active one, else (on page load) the newest, shown once.
function embtrainPickRun() {
    if (embtrainRunId) return Promise.resolve(embtrainRunId);
    return embtrainFetch('./embtrain/v1/runs').then(function(data) {
        var runs = (data && data.runs) || [];
        if (embtrainTaskId) {
            var mine = runs.filter(function(r) {
                return r.task_id === embtrainTaskId;
            });
            return mine.length ? mine[0].id : null;
        }
        return (data && data.active_id) || (runs.length ? runs[0].id : null);
    });
}

// One poll: fetch the followed run's loss history and previews, draw; stop polling when it has ended.
function embtrainPoll() {
    embtrainPickRun().then(function(runId) {
        if (!runId) {
            if (!embtrainTaskId || embtrainTaskEnded) embtrainStopPolling();
            return null;
        }
        embtrainRunId = runId;
        embtrainTaskId = null;
        return embtrainFetch('./embtrain/v1/runs/' + encodeURIComponent(runId));
    }).then(function(run) {
        if (!run) return;
        embtrainDraw(run);
        embtrainShowPreviews(run);
        if (run.active) embtrainStartPolling();
        else embtrainStopPolling();
    }).catch(function(error) {
        console.warn('embtrain: ' + error);
    });
}

// Adds the run's new preview images (oldest first) to the gallery; a different run clears it.
function embtrainShowPreviews(run) {
    var box = embtrainEl('embtrain_previews');
    if (!box) return;
    if (box.dataset.run !== run.id) {
        box.textContent = '';
        box.dataset.run = run.id;
    }
    var urls = run.previews || [];
    var steps = run.preview_at_steps || [];
    for (var i = box.children.length; i < urls.length; i++) {
        var figure = document.createElement('figure');
        figure.className = 'embtrain-preview';
        var img = document.createElement('img');
        img.src = urls[i];
        img.alt = 'step ' + steps[i];
        img.loading = 'lazy';
        var caption = document.createElement('figcaption');
        caption.textContent = 'step ' + steps[i];
        figure.appendChild(img);
        figure.appendChild(caption);
        box.appendChild(figure);
    }
}

function embtrainChartReset() {
    var canvas = embtrainEl('embtrain_loss_canvas');
    if (!canvas) return;
    canvas.dataset.points = '0';
    var ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, canvas.width, canvas.height);
}

// Loss (thin, light) and smoothed loss (thick) against the step; axes with min/max labels.
function embtrainDraw(run) {
    var canvas = embtrainEl('embtrain_loss_canvas');
    if (!canvas) return;
    var points = (run.loss_history || []).filter(function(p) {
        return p && p[1] !== null && isFinite(p[1]);
    });
    var width = canvas.clientWidth || canvas.width;
    var ratio = window.devicePixelRatio || 1;
    var height = 240;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    canvas.dataset.scale = String(ratio);
    var ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    var style = getComputedStyle(canvas);
    var fg = style.color || '#888';
    ctx.font = '11px sans-serif';
    ctx.fillStyle = fg;
    var title = (run.name || '') + ' - ' + run.state + ' - step ' + run.step + '/' + run.total_steps;
    ctx.fillText(title, 8, 14);
    canvas.dataset.points = String(points.length);
    canvas.dataset.state = run.state || '';
    canvas.dataset.run = run.id || '';
    if (points.length < 1) return;
    var left = 48, right = width - 10, top = 24, bottom = height - 22;
    var xs = points.map(function(p) {
        return p[0];
    });
    var ys = [];
    points.forEach(function(p) {
        ys.push(p[1]);
        if (p[2] !== null && isFinite(p[2])) ys.push(p[2]);
    });
    // The held-out score every eval_every steps: same units (a denoising loss), drawn as dots.
    var scores = (run.held_out_history || []).filter(function(p) {
        return p && p[1] !== null && isFinite(p[1]);
    });
    canvas.dataset.scores = String(scores.length);
    scores.forEach(function(p) {
        ys.push(p[1]);
    });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) {
        y1 += 0.5; y0 -= 0.5;
    }
    var sx = function(x) {
        return left + (x - x0) / (x1 - x0) * (right - left);
    };
    var sy = function(y) {
        return bottom - (y - y0) / (y1 - y0) * (bottom - top);
    };
    ctx.strokeStyle = fg;
    ctx.globalAlpha = 0.4;
    ctx.beginPath();
    ctx.moveTo(left, top); ctx.lineTo(left, bottom); ctx.lineTo(right, bottom);
    ctx.stroke();
    ctx.globalAlpha = 1;
    ctx.fillText(y1.toPrecision(3), 4, top + 8);
    ctx.fillText(y0.toPrecision(3), 4, bottom);
    ctx.fillText(String(x0), left, bottom + 14);
    var last = String(x1);
    ctx.fillText(last, right - ctx.measureText(last).width, bottom + 14);
    var line = function(index, color, lineWidth, alpha) {
        ctx.strokeStyle = color;
        ctx.lineWidth = lineWidth;
        ctx.globalAlpha = alpha;
        ctx.beginPath();
        var started = false;
        points.forEach(function(p) {
            if (p[index] === null || !isFinite(p[index])) return;
            if (started) ctx.lineTo(sx(p[0]), sy(p[index]));
            else ctx.moveTo(sx(p[0]), sy(p[index]));
            started = true;
        });
        ctx.stroke();
        ctx.globalAlpha = 1;
    };
    line(1, '#4a90d9', 1, 0.5);
    line(2, '#e8743b', 2, 1);
    ctx.fillStyle = '#2e9e4f';
    scores.forEach(function(p) {
        ctx.beginPath();
        ctx.arc(sx(p[0]), sy(p[1]), 3, 0, 2 * Math.PI);
        ctx.fill();
    });
    ctx.fillStyle = '#4a90d9';
    ctx.fillText('loss', right - 170, 14);
    ctx.fillStyle = '#e8743b';
    ctx.fillText('smoothed', right - 130, 14);
    ctx.fillStyle = '#2e9e4f';
    ctx.fillText('held-out', right - 70, 14);
}

// On page load: the active run (one started through the HTTP API too) is followed live, else the newest is shown.
onUiLoaded(function() {
    if (embtrainEl('embtrain_loss_canvas')) embtrainPoll();
});
