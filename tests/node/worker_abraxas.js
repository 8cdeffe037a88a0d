'use strict'
// A worker written with abraxas 2.1.10, for tests/test_interop_node_workers.py.
//
//   node worker_abraxas.js HOST PORT FUNCTION TIMEOUT
//
// Registers FUNCTION with registerWorker(FUNCTION, {timeout: TIMEOUT}): the library sends
// CAN_DO_TIMEOUT with String(TIMEOUT) as the timeout (its README says seconds, so "2.5" is a
// real value). Every job's result is "abraxas:" + its payload upper-cased. abraxas reconnects
// on its own when the server closes the connection. One line on stdout per event:
//   connected N       connection number N is up (abraxas re-registers on each one)
//   ready N           the server answered the ECHO sent after connection N's registration
//   job PAYLOAD       a job was assigned
//   disconnect        the connection ended
//   error MESSAGE     a connection or server error (an ERROR packet, a reset...)
const Gearman = require('abraxas')

const [host, port, func, timeout] = process.argv.slice(2)
const say = (line) => process.stdout.write(line + '\n')
const client = Gearman.Client.connect({ servers: [`${host}:${port}`], defaultEncoding: 'utf8' })

client.registerWorker(func, { timeout: Number(timeout) }, (task) => {
  say(`job ${task.payload}`)
  return `abraxas:${task.payload.toUpperCase()}`
})

let connections = 0
// The worker's own 'connect' listener (added in abraxas' constructor) runs first and writes
// the CAN_DO_TIMEOUT; this ECHO goes out after it on the same connection.
client.on('connect', () => {
  const n = ++connections
  say(`connected ${n}`)
  client.echo(`ready ${n}`, (error) => say(error ? `error echo ${error.message}` : `ready ${n}`))
})
client.on('disconnect', () => say('disconnect'))
client.on('connection-error', (error) => say(`error ${error.message}`))
client.on('error', (error) => say(`error ${error.message}`))
