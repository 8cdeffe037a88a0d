'use strict'
// A worker written with node `gearman` 2.1.0, for tests/test_interop_node_workers.py.
//
//   node worker_gearman.js HOST PORT FUNCTION TIMEOUT_MS
//
// Registers FUNCTION with addFunction(FUNCTION, TIMEOUT_MS): the library sends CAN_DO_TIMEOUT
// with the timeout as a 4-byte big-endian integer. Every job's result is
// "gearman:" + its payload upper-cased. One line on stdout per event, for the test to wait on:
//   ready             the server answered the ECHO sent right after the registration
//   job PAYLOAD       a job was assigned
//   ERROR CODE TEXT   the server sent an ERROR packet
//   error CODE        a socket error (ECONNRESET: the server reset the connection)
//   close HAD_ERROR   the connection closed (this library never reconnects; we exit)
const gearman = require('gearman')

const [host, port, func, timeout] = process.argv.slice(2)
const say = (line) => process.stdout.write(line + '\n')
const worker = gearman(host, Number(port))

worker.on('JOB_ASSIGN', (job) => {
  const payload = job.payload.toString()
  say(`job ${payload}`)
  worker.sendWorkComplete(job.handle, `gearman:${payload.toUpperCase()}`)
  worker.preSleep()
})
worker.on('NOOP', () => worker.grabJob())
worker.on('NO_JOB', () => worker.preSleep())
worker.on('ECHO_RES', () => say('ready'))
worker.on('ERROR', (code, text) => say(`ERROR ${code} ${text}`))
worker.on('error', (error) => say(`error ${error.code || error.message}`))
worker.on('close', (hadError) => {
  say(`close ${hadError}`)
  process.exit(hadError ? 1 : 0)
})

worker.connect(() => {
  worker.addFunction(func, Number(timeout))
  worker.echo('registered?')
  worker.preSleep()
})
